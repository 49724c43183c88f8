"""FedProto in its own protocol — Tan et al., "FedProto: Federated Prototype Learning across
Heterogeneous Clients", AAAI 2022: personal models, no weight averaging.

Everything of `algorithms/fedproto.py` (Eq. 4 local prototypes, Eq. 6 server mean, Eq. 8 client
loss, the optional nearest-prototype inference of §4.3) but the one reading choice made there
for a global test set: here, as in the paper and its code, clients exchange prototypes only.
Each client keeps its whole model (its architecture's initial weights the first time), uploads
its class prototypes and counts and no weights, and is scored on its own test part with its
own model (`evaluation.personal`). As no weights are averaged, clients may have different
architectures (`model.heterogeneous`; prototypes need one `feature_dim`).

Privacy: local DP uploads the prototypes as FedProto's (clipped per sample, noised sums and
counts) and no weights: any one sample is protected; central DP is refused.
"""

from __future__ import annotations

from algorithms.fedproto import FedProto
from raysim.algorithm import PersonalModel


class FedProtoPersonal(PersonalModel, FedProto):
    shares = "none"
