"""The training loop shared by pretrain, finetune and dpo, and what it needs around it.

    config.py       TrainConfig: the `train:` section (optimizer, schedule, batch, checkpoints)
    loop.py         train(): one function, given a model, a batch source and a loss
    optim.py        AdamW with weight decay on matrices only; Muon for hidden matrices
    schedule.py     warmup then cosine, warmup-stable-decay (WSD) or constant
    checkpoint.py   atomic checkpoint directories, keep the last K, exact resume
    distributed.py  torchrun detection, DDP, FSDP2, collectives that are no-ops on one process
    report.py       metrics.jsonl, the loss-curve PNG and report.md
"""
