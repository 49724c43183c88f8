"""FedAvg + FT — FedAvg (McMahan et al., AISTATS 2017) whose global model each client
fine-tunes before deploying it: the personalised-FL baseline of FL-bench (its `finetune`
epochs) and PFLlib ("FedAvg-FT").

Training is FedAvg's. Personalised evaluation scores, for client k, the global model w_t after
`finetune_epochs` local epochs of the task's loss on k's training part with a fresh optimiser
(`raysim.algorithm.fine_tune`); the global model itself is still scored on the global test set.
`evaluation.personal.finetune_epochs`, where set, takes precedence over the method's own key,
so every method of a comparison fine-tunes alike.

Privacy as FedAvg's: fine-tuning happens on the client and uploads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from algorithms.fedavg import FedAvg
from raysim.algorithm import LEARNING_RATE_SPACE, LocalRound, fine_tune
from raysim.config import require


class FedAvgFT(FedAvg):
    search_space = {**LEARNING_RATE_SPACE,
        "algorithm.finetune_epochs": {"choice": [1, 2, 5]}}

    @dataclass(frozen=True)
    class Config:
        finetune_epochs: int = 1  # local epochs on the global model before it is deployed

        def __post_init__(self) -> None:
            require(self.finetune_epochs >= 1, "finetune_epochs",
                    f"must be >= 1 (got {self.finetune_epochs}; 0 is plain fedavg)")

    def deployed_model(self, step: LocalRound) -> nn.Module:
        epochs = (self.task and self.task.finetune_epochs) or self.config.finetune_epochs
        self.load_weights(step)
        return fine_tune(self, step, epochs)
