"""Local — every client trains its own model alone: the no-communication baseline of
personalised FL (the "Local" rows of PFLlib, HtFLlib and FedProto's tables).

Client k runs E epochs of the task's loss on its own data from the model it left off with
(its architecture's initial weights the first time) and keeps it; nothing is averaged. What
leaves the client is its sample count (and its training metrics): no weights, no statistics.
Scored by personalised evaluation only (`evaluation.personal`), each client on its own test
part; it runs on any architecture or heterogeneous group, as nothing is shared.

Privacy: nothing but a sample count leaves the client, so there is nothing to privatise (a
configured mechanism still reports the ε it would spend on a weights upload).
"""

from __future__ import annotations

from algorithms.fedavg import FedAvg
from raysim.algorithm import PersonalModel


class Local(PersonalModel, FedAvg):
    shares = "none"
