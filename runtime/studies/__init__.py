"""Studies on top of training: OOD robustness of classifiers, the demo's tasks, curves as PNG.

    ood.py         MSP, energy and Mahalanobis scores; AUROC, FPR@95
    robustness.py  `colaflow eval --ood`: a linear probe and each adapter kind, scored
    plot.py        loss and eval curves as a PNG
    tasks/         invented facts (the demo's knowledge task), intents (classification)
"""
