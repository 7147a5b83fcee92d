"""Print the folder of the offline lm-eval task pack:
`lm_eval ... --include_path "$(python -m linear_decay.eval_tasks)" --tasks shakespeare`."""

from linear_decay.eval_tasks import TASKS_DIR

if __name__ == "__main__":
    print(TASKS_DIR)
