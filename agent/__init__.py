"""Agentic OPD: multi-turn, tool-using rollouts (SPEC §6).

`agent.env`      the environment interface and the registry (`agent.env` names one)
`agent.calls`    tool-call parsers, one per chat format (Qwen3 / Hermes `<tool_call>{json}</tool_call>`)
`agent.rollout`  conversations built incrementally, batched across conversations, one engine call per turn
`agent.evaluate` Avg@k / Best@k over held-out tasks
`agent.lookup`   the small lookup-and-add environment of the tests and the CPU demo
`agent.deepplanning`  the DeepPlanning travel environment and its offline scorer (table 7)

Imports only `lm` of ours.
"""
