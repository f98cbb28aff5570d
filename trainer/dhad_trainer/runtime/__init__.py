"""What a pod runs around a stage: the launcher (pod entrypoint, checks, torchrun, exit codes), the
worker torchrun starts, torch.distributed setup, the parallelism configs (DeepSpeed), the Trainer
callbacks and progress reporting. May import storage/, data/ (readers) and stages/ (by name, at run
time); storage/ never imports runtime/, and stages/ only `distributed`, `callbacks` and `tracking`
(what a stage plugs into its Trainer).
"""
