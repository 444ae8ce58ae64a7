"""The `deepplanning_travel` environment: DeepPlanning's 120 travel tasks, 9 tools, offline scoring.

Options (the `agent.env_args` of a config):
    task_file          travelplanning_query_<lang>.json of the benchmark (required)
    database_root      the unpacked database_<lang>/ holding id_<task id>/ directories (hub dataset
                       Qwen/DeepPlanning); needed by the tools and the database commonsense checks
    language           'en' or 'zh': system prompt, tool messages and the default schema file
    plan_format        'json': the agent writes the plan as JSON inside <plan>...</plan> (the default);
                       'text': it writes the plan in prose, and `converter` rewrites it as that JSON
    converter          a local model (path or hub id) that converts a free-text plan into the <plan> JSON
                       (convert.py); with plan_format 'json' it converts answers without a readable block
    converter_max_new_tokens  the converter's output length cap
    tool_schema_file   the 9 tool schemas; default tool_schema_<language>.json beside the task file
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from agent.deepplanning.convert import PlanConverter
from agent.deepplanning.database import TaskDatabase
from agent.deepplanning.plan import extract_plan
from agent.deepplanning.prompt import system_prompt
from agent.deepplanning.scoring import score_plan
from agent.deepplanning.tools import TOOL_ARGS, run_tool
from agent.env import Environment, Score, Task, ToolError

HUB = "the hub dataset Qwen/DeepPlanning (database_en / database_zh archives)"


@dataclass
class TravelState:
    """One conversation: its task, the task's (shared, read-only) database and the calls it made."""

    task_id: str
    database: TaskDatabase
    calls: list[tuple[str, dict]] = field(default_factory=list)


class TravelEnv(Environment):
    name = "deepplanning_travel"

    def __init__(self, task_file: str = "", database_root: str = "", language: str = "en",
                 plan_format: str = "json", tool_schema_file: str = "", converter: str = "",
                 converter_max_new_tokens: int = 4096):
        if language not in ("en", "zh"):
            raise ValueError(f"deepplanning_travel: language must be 'en' or 'zh', not {language!r}")
        if plan_format not in ("json", "text"):
            raise ValueError(f"deepplanning_travel: plan_format must be 'json' or 'text', not {plan_format!r}")
        if plan_format == "text" and not converter:
            raise ValueError("deepplanning_travel: plan_format 'text' needs a converter model (converter: PATH)")
        self.converter_path, self.converter_max_new_tokens = converter, converter_max_new_tokens
        self._converter = None  # loaded at the first conversion
        self.task_file = Path(task_file) if task_file else None
        self.database_root = Path(database_root) if database_root else None
        self.language = language
        self.plan_format = plan_format
        default_schema = self.task_file.parent / f"tool_schema_{language}.json" if self.task_file else None
        self.tool_schema_file = Path(tool_schema_file) if tool_schema_file else default_schema
        self._tasks: list[Task] | None = None
        self._schemas: list[dict] | None = None
        self._databases: dict[str, TaskDatabase] = {}

    def tasks(self) -> list[Task]:
        """Every task of the task file (the databases are not needed for this)."""
        if self._tasks is None:
            if self.task_file is None or not self.task_file.is_file():
                raise FileNotFoundError(f"deepplanning_travel: task file not found: {self.task_file}")
            records = json.loads(self.task_file.read_text(encoding="utf-8"))
            prompt = system_prompt(self.language, self.plan_format)
            self._tasks = [Task(id=str(r["id"]), data=r,
                                messages=({"role": "system", "content": prompt}, {"role": "user", "content": r["query"]}))
                           for r in records]
        return self._tasks

    def tools(self, task: Task) -> list[dict]:
        """The 9 official tool schemas (OpenAI function format), the same for every task."""
        if self._schemas is None:
            if self.tool_schema_file is None or not self.tool_schema_file.is_file():
                raise FileNotFoundError(f"deepplanning_travel: tool schema file not found: {self.tool_schema_file}")
            self._schemas = json.loads(self.tool_schema_file.read_text(encoding="utf-8"))
        return self._schemas

    def database(self, task_id: str) -> TaskDatabase:
        """The task's database (cached; rows are read-only, so conversations share it safely)."""
        if task_id not in self._databases:
            root = self.database_root or Path("")
            self._databases[task_id] = TaskDatabase(root / f"id_{task_id}")
        return self._databases[task_id]

    def start(self, task: Task) -> TravelState:
        return TravelState(task_id=task.id, database=self.database(task.id))

    def call(self, state: TravelState, name: str, arguments: dict) -> str:
        """Runs one tool on the conversation's task database; ToolError for any bad call."""
        state.calls.append((name, dict(arguments) if isinstance(arguments, dict) else {}))
        if name in TOOL_ARGS and not state.database.exists():
            raise ToolError(f"the database of task {state.task_id} is not available ({state.database.directory})")
        return run_tool(state.database, self.language, name, arguments)

    def score(self, task: Task, state: TravelState | None, final_text: str) -> Score:
        """Hard-constraint rate of the <plan> JSON, with commonsense and composite in parts."""
        db = state.database if isinstance(state, TravelState) else self.database(task.id)
        db = db if db.exists() else None
        if self.converter_path and (self.plan_format == "text" or extract_plan(final_text) is None):
            score = score_plan(task.data, self.convert(final_text), db)
            return Score(score.value, {**score.parts, "converted": 1.0})
        score = score_plan(task.data, final_text, db)
        return Score(score.value, {**score.parts, "converted": 0.0}) if self.converter_path else score

    def convert(self, plan_text: str) -> str:
        """The converter's <plan> rewrite of a free-text answer (the model is loaded on first use)."""
        if self._converter is None:
            self._converter = PlanConverter(self.converter_path, self.converter_max_new_tokens)
        return self._converter(plan_text)

    def check(self) -> list[str]:
        """One line per missing file or directory."""
        if self.task_file is None or not self.task_file.is_file():
            return [f"deepplanning_travel: task file not found: {self.task_file or '(task_file not set)'}"]
        problems = []
        if self.converter_path.startswith((".", "/", "~")) and not Path(self.converter_path).expanduser().exists():
            problems.append(f"deepplanning_travel: converter model not found: {self.converter_path}")
        if self.tool_schema_file is None or not self.tool_schema_file.is_file():
            problems.append(f"deepplanning_travel: tool schema file not found: {self.tool_schema_file}")
        if self.database_root is None or not self.database_root.is_dir():
            where = self.database_root or "(database_root not set)"
            return problems + [f"deepplanning_travel: database root not found: {where}; the databases come from {HUB}"]
        for task in self.tasks():
            directory = self.database_root / f"id_{task.id}"
            if not directory.is_dir():
                problems.append(f"deepplanning_travel: task {task.id} database not found: {directory}; "
                                f"the databases come from {HUB}")
        return problems
