"""FedPer — Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization
Layers", arXiv:1912.00818, 2019.

The model is base layers (the body: everything but the last layer, `classifier`) and
personalisation layers (the head). Client k trains the whole model (base layers as received,
its own head) for E epochs of the task's loss and sends only the base layers; the server
averages them by sample count, FedAvg's mean restricted to the body:
    W_B^{t+1} = Σ_k n_k W_{B,k}^{t+1} / Σ_k n_k,        W_{P,k} stays on client k.
Each client deploys the averaged body with its own head. One architecture for all clients
(the body is averaged); scored by personalised evaluation (`evaluation.personal`).

Privacy as FedAvg's, for the body: central DP clips and noises the body's delta; local DP
uploads the body privatised; the head never leaves the client.
"""

from __future__ import annotations

from algorithms.fedavg import FedAvg
from raysim.algorithm import PersonalModel


class FedPer(PersonalModel, FedAvg):
    shares = "body"
    needs_features = True  # body and head meet at the features
    tasks = ("classification",)
