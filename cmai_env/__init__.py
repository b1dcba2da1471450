"""CMAI: Cross-Modal Adversarial Immunization.

Library (backbones, data, consistency verification, attacks, adversarial training) and the
Gymnasium environment that composes them.
"""

__version__ = "0.1.0"
