"""The two transport-free state machines and what they exchange; the in-process driver.

    protocol.py    Hello, Assign, Packets, Ack, Revoke, Refusal (+ Update): typed messages
    status.py      JobInfo, LIVE, ENDED: a job's status as every caller sees it (torch-free)
    records.py     what the scheduler knows of each job, site and worker
    scheduler.py   Scheduler: which job steps when, with which versions; it locks itself
    planning.py    ready, begin, finish: steps and their versions
    placement.py   which worker owns which site; lost, stalled and quarantined workers
    balance.py     a worker that joins or returns takes a share of running jobs' sites
    delivery.py    credits, packets out, updates in, acknowledgements
    progress.py    durability (the Store) and restore after a restart
    views.py       what operators see: job status, jobs and workers
    acceptance.py  the checks an update (or an `init`) must pass
    store.py       Store: what survives a server restart (in memory here; the state dir in the server)
    worker.py      Worker: a device's learners, replay filter, checkpoint before emit
    checkpoints.py a worker's checkpoints on its own disk
    admission.py   the one submit path: data, sites, host and scheduler, all or nothing
    trainer.py     Trainer: host, scheduler and worker in one process, synchronous delivery
"""
