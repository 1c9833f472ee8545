"""`python -m rice_mllm.serve`: see `rice_mllm.serve.cli`."""

from rice_mllm.inference import quiet_transformers
from rice_mllm.serve.cli import main

quiet_transformers()
raise SystemExit(main())
