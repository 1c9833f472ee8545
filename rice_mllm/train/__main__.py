"""`python -m rice_mllm.train --config recipes/X.yaml [a.b=value ...]`: run one training stage."""

from .trainer import cli

cli()
