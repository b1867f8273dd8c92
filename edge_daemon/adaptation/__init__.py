"""The update path, from "should the model adapt?" to "the new adapter serves".

One owner, `owner.Adaptation`, on the daemon's side; the steps, in order:

1. `trigger`: the device is idle and there is a reason (residual drift, enough new data, a
   request); `Adaptation` adds the start rule (the worker's expected memory fits under critical).
2. `runner`: an `UpdateJob` goes to a training worker forked from the helper (`training.worker`);
   its `Progress` and its one `JobResult` come back (`training.records`).
3. In the worker (`training.job`): the data since the change plus replay, the plan (dry runs
   against `[memory] update_share`), training under the governor, the gate (`training.loop.update`),
   and the commit of an accepted adapter with its `AdapterMeta` (not yet current).
4. `Adaptation.on_result`: the scorer swaps the adapter in, then `current` names it.

Rollback and "which adapter is served" are `Adaptation`'s too; `commands` builds the replies
to the `adapter`, `adapters`, `train` and `rollback` commands and the `adapter` and `training`
sections of `status` from it. Nothing here is imported by the package's `__init__`, so the
trigger is importable without torch.
"""
