"""Published fits of the laws of ``scaling.laws``, to set ours beside (``scaling.plots``'s
``published.png``, ``fit.md``). Each entry names its source; coefficients are in our
parametrisation (natural logs, N = parameters, D = tokens).

Clark et al. 2022 and Ludziejewski et al. 2025 publish fits of their laws too; they are not
transcribed here: the values could not be checked against the papers where this was
written (no network), and a wrong published number beside ours is worse than none. Add
them as entries of ``PUBLISHED`` with their table's reference once checked (Clark et al.
fit log10: convert c x ln 10 and d / ln 10, see ``scaling.laws``).
"""

from __future__ import annotations

PUBLISHED = {
    "chinchilla": [
        {"source": "Hoffmann et al. 2022 (Chinchilla), approach 3",
         "coefs": {"A": 406.4, "B": 410.7, "E": 1.69, "alpha": 0.34, "beta": 0.28}},
        {"source": "Besiroglu et al. 2024 (Epoch AI's refit of Chinchilla's data)",
         "coefs": {"A": 482.01, "B": 2085.43, "E": 1.8172, "alpha": 0.3478, "beta": 0.3658}},
    ],
    "krajewski": [
        {"source": "Krajewski et al. 2024, Eq. 9 (fine-grained MoE, expansion rate fixed)",
         "coefs": {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1,
                   "gamma": 0.58, "c": 0.47}},
    ],
    "clark": [],
    "joint": [],
}

#: the dimensionless coefficients compared on one plot (scales depend on units and data)
COMPARED = {"chinchilla": ("alpha", "beta", "E"), "krajewski": ("alpha", "beta", "gamma", "c"),
            "clark": ("a", "b", "c"), "joint": ("alpha", "beta", "gamma", "delta", "zeta",
                                                "omega", "c")}
