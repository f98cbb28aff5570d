"""One module per (sub-)stage a job runs: pretrain, respond, sft, feedback, reward, policy, eval. Each
exposes `run(StageRun) -> StageResult` (base.py) and never sets up torch.distributed or talks to S3
itself: the runtime hands it local folders. May import data/, llm/, evaluation/, storage/ (local
helpers) and, of runtime/, only what it plugs into its Trainer: distributed (barriers), callbacks and
tracking; never the launcher or the worker, never local/ (tests/unit/test_layout.py).
"""
