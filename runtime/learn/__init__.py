"""Gradient learning on the device: the fit, the learner around it, optimizers and schedules.

    messages.py  Packet, Update, LearnerState, OptimizerState: what goes into a fit and comes out
    fit.py       `fit`: one optimizer step on the GL objective (J^T g); the checks of packets and fits
    learner.py   Learner: one (job, site)'s adapter, optimizer and I-buffer; the plain form of its state
    optim.py     AdamW, Adam, SGD and their LR schedules, in one registry
"""
