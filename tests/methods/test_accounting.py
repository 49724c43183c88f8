"""Accounting: one Gaussian mechanism's ε(δ) against the analytic Gaussian mechanism (Balle &
Wang, ICML 2018) written out here; composed ε over T rounds against dp-accounting called
directly on the same event; local composition against the closed form; calibration."""

from __future__ import annotations

import math

import dp_accounting as dp
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize
from scipy.stats import norm

from raysim.config import ConfigError, PrivacyConfig
from raysim.methods.accounting import Accountant, central_event, gaussians
from raysim.methods.privacy import local_event, plan_privacy


def analytic_gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """Balle & Wang (2018), Thm. 8: the Gaussian mechanism N(0, σ²) on a function of L2
    sensitivity Δ is (ε, δ)-DP exactly when
    δ ≥ Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ); the smallest such ε."""

    def delta_of(eps: float) -> float:
        a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
        return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b)

    return optimize.brentq(lambda eps: delta_of(eps) - delta, 0.0, 100.0, xtol=1e-12)


def central(sigma, sampling, num_clients, per_round, accountant="rdp", **keys):
    privacy = PrivacyConfig(mechanism="central", noise_multiplier=sigma, sampling=sampling,
                            accountant=accountant, **keys)
    return plan_privacy(privacy, method="fedavg", uploads="weights", weighted_mean=True,
                        num_clients=num_clients, clients_per_round=per_round, rounds=100)


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_one_gaussian_mechanism_is_the_analytic_gaussian(sigma):
    # every client every round under Poisson sampling (q = 1): one round is a plain Gaussian
    plan = central(sigma, "poisson", 20, 20, accountant="pld", delta=1e-5)
    exact = analytic_gaussian_epsilon(sigma, 1e-5)
    pld = plan.make_accountant().epsilon(1)
    assert exact <= pld <= exact + 2e-3  # PLD is pessimistic by its grid, never optimistic
    assert plan.make_accountant().epsilon(0) == 0.0
    rdp = Accountant(plan.event(), 1e-5, "rdp").epsilon(1)
    assert rdp >= exact  # RDP's conversion is an upper bound, looser
    # the same through a local release of one Gaussian
    assert Accountant(gaussians([sigma]), 1e-5, "pld").epsilon(1) == pytest.approx(exact, abs=2e-3)


def test_composed_epsilon_equals_dp_accounting_called_directly():
    rounds, delta = 60, 1e-5
    poisson = central_event(1.1, "poisson", 1000, 20)
    fixed = central_event(1.1, "fixed", 1000, 20)
    direct = rdp_privacy_accountant.RdpAccountant().compose(poisson, rounds).get_epsilon(delta)
    assert Accountant(poisson, delta, "rdp").epsilon(rounds) == direct  # the same bits
    replace = dp.NeighboringRelation.REPLACE_ONE
    direct = rdp_privacy_accountant.RdpAccountant(neighboring_relation=replace).compose(
        fixed, rounds).get_epsilon(delta)
    assert Accountant(fixed, delta, "rdp").epsilon(rounds) == direct
    assert fixed.event.noise_multiplier == pytest.approx(0.55)  # replace-one: sensitivity 2C
    direct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3).compose(
        poisson, rounds).get_epsilon(delta)
    assert Accountant(poisson, delta, "pld").epsilon(rounds) == pytest.approx(direct, rel=1e-9)
    # per round: cached, increasing
    accountant = Accountant(poisson, delta, "rdp")
    curve = [accountant.epsilon(t) for t in range(1, rounds + 1)]
    assert curve == sorted(curve) and curve[-1] == accountant.epsilon(rounds)
    assert Accountant(central_event(0.0, "poisson", 1000, 20), delta).epsilon(3) == math.inf


def test_local_release_composes_like_one_gaussian():
    # weights (σ/2), class sums (σ) and counts (σ): one Gaussian of σ/√6; m participations σ/√(6m)
    sigma, m, delta = 3.0, 4, 1e-5
    event = local_event("prototypes", sigma)
    epsilon = Accountant(event, delta, "pld").epsilon(m)
    assert epsilon == pytest.approx(analytic_gaussian_epsilon(sigma / math.sqrt(6 * m), delta),
                                    abs=5e-3)
    assert local_event("prototypes", sigma, weights_shared=False) == gaussians([sigma, sigma])


def test_calibration_reaches_the_target_and_no_further():
    rounds, delta, target = 40, 1e-5, 2.0
    privacy = PrivacyConfig(mechanism="central", target_epsilon=target, sampling="poisson",
                            delta=delta)
    plan = plan_privacy(privacy, method="fedavg", uploads="weights", weighted_mean=True,
                        num_clients=500, clients_per_round=25, rounds=rounds)
    sigma = plan.noise_multiplier
    assert plan.make_accountant().epsilon(rounds) <= target
    assert Accountant(plan.event(sigma - 2e-3), delta).epsilon(rounds) > target


def test_an_unreachable_target_is_one_line():
    # RDP's conversion cannot go below about log(1/δ)/(α_max − 1), whatever σ
    privacy = PrivacyConfig(mechanism="central", target_epsilon=0.001, sampling="poisson",
                            delta=1e-5)
    with pytest.raises(ConfigError, match=r"^privacy.target_epsilon: 0.001 cannot be reached "
                       r"within 30 rounds at δ = 1e-05 \(ε = 0.00\d+ even at σ = 1000\); "
                       r"raise target_epsilon") as error:
        plan_privacy(privacy, method="fedavg", uploads="weights", weighted_mean=True,
                     num_clients=100, clients_per_round=10, rounds=30)
    assert "\n" not in str(error.value)
