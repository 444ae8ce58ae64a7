"""The one preparation step of the demo configs: model paths `demo:*` name prepared pairs.

`python train.py` runs this step after its checks and before the run's set-up (opd.cli): each pair a
config names is trained on first use and cached (demo/prepare.py, demo/agent_prepare.py; the same as
`python -m demo.prepare` / `python -m demo.agent_prepare`), and the run then loads the cached checkpoints as
it loads any other. Nothing is prepared inside the training run itself (STYLE point 9).
"""

from __future__ import annotations

from demo import real_task, task
from demo.agent_config import AgentDemoConfig
from demo.agent_prepare import prepare_agent_pair
from demo.config import DemoConfig
from demo.prepare import prepare_pair
from demo.real_config import RealDemoConfig
from demo.real_prepare import prepare_real_pair

MODELS = ("demo:teacher", "demo:student", "demo:agent_teacher", "demo:agent_student", "demo:real_teacher",
          "demo:real_student")
TASKS = (f"demo:{task.NAME}", f"demo:{real_task.TRAIN_NAME}", f"demo:{real_task.HELDOUT_NAME}")


def check(train_path: str, model_paths: dict[str, str]) -> list[str]:
    """The demo task and model names (`model_paths`: config section -> path), one line per unknown one."""
    problems = []
    if train_path.startswith("demo:") and train_path not in TASKS:
        problems.append(f"data.train_path: unknown demo task {train_path!r} (known: {', '.join(TASKS)})")
    for section, path in model_paths.items():
        if path.startswith("demo:") and path not in MODELS:
            problems.append(f"{section}.path: unknown demo model {path!r} (known: {', '.join(MODELS)})")
    return problems


def prepare(paths, demo: DemoConfig, agent_demo: AgentDemoConfig, real_demo: RealDemoConfig | None = None,
            log=print) -> dict[str, str]:
    """The named step: every demo model name among `paths` -> the checkpoint directory of its prepared pair.

    The pairs are trained when absent (several processes of one launch: one trains, the others wait for it
    and reuse its pair); other paths are left out of the result. ValueError for an unknown demo name.
    """
    wanted = {p for p in paths if p.startswith("demo:")}
    unknown = sorted(wanted - set(MODELS))
    if unknown:
        raise ValueError(f"unknown demo model {unknown[0]!r} (known: {', '.join(MODELS)})")
    out = {}
    pairs = (("demo:agent_", prepare_agent_pair, agent_demo), ("demo:real_", prepare_real_pair, real_demo),
             ("demo:", prepare_pair, demo))
    for prefix, build, settings in pairs:
        names = {prefix + "teacher", prefix + "student"}
        if wanted & names:
            teacher, student = build(settings, log=log)
            out.update({prefix + "teacher": str(teacher), prefix + "student": str(student)})
    return {name: path for name, path in out.items() if name in wanted}
