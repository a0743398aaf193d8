"""The capture step on the frozen model: forward with each job's adapters, backward for site gradients.

    host.py      Host: the frozen model, the jobs it hosts, `step` (and `using` for inference)
    hosted.py    HostedJob, StepResult
    hooks.py     the site hook: each row's job's delta, the inputs the packets carry
    layout.py    whether a site's input runs along the batch's rows (mixed batches split only then)
    packets.py   site gradients into packets during the backward, one input group at a time
    mixed.py     tenants in micro-batches; stacked LoRA for one call per site
    lmhead.py    the causal-LM loss fused with the head (no B x T x V tensor kept)
    loss.py      task losses, normalised per job
    blackbox.py  black-box output mode: a forward only, top-k log-probs as packets
    classify.py  sequence classifiers: a frozen head every job adapts as a site
    evaluate.py  eval while training: eval_loss, greedy exact match
"""
