"""Deep-network training entry point: ``fogzo train`` and the comparison driver.

    from fogzo.train import load_config, train
    config = load_config("experiments/configs/resnet20_fmnist.toml", ["--estimator=fogzo"], quick=True)
    results = train(config)

Command line: ``python -m fogzo.train --config FILE [--quick] [--resume] [--key=value ...]``
(or ``fogzo train ...`` once the main CLI registers :func:`add_train_parser`), and
``python -m fogzo.train.compare --config FILE --estimators ste,fogzo --seeds 0,1,2
--lrs 1e-3,3e-3 --out DIR``. See :mod:`fogzo.train.trainer` for the outputs.
"""

from .build import build_estimator, build_optimizer, build_quantized_model, plan_model
from .checks import check_config
from .cli import add_train_parser, main
from .config import ConfigError, TrainConfig, load_config, parse_overrides
from .config_io import config_from_dict
from .trainer import TrainingInterrupted, train

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainingInterrupted",
    "add_train_parser",
    "build_estimator",
    "build_optimizer",
    "build_quantized_model",
    "check_config",
    "config_from_dict",
    "load_config",
    "main",
    "parse_overrides",
    "plan_model",
    "train",
]
