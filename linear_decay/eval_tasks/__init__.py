"""The offline lm-eval task pack `shakespeare` (README.md beside this file). lm-eval finds it through
`--include_path`; `python -m linear_decay.eval_tasks` prints the folder, wherever the package is installed:

    lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True \\
        --include_path "$(python -m linear_decay.eval_tasks)" --tasks shakespeare --device cpu
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
