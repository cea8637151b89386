"""``proj``: the only trainable part — maps OCR-encoder features into the LLM's embedding space."""

from __future__ import annotations

from torch import nn

from .errors import ConfigError


def build_projector(projector_type: str, in_features: int, hidden_size: int) -> nn.Module:
    """Build the trainable projector.

    Args:
        projector_type: ``"linear"`` — one ``Linear(in, hidden)``; ``"mlp2x_gelu"`` — the user's
            ``Linear(in, max(in, hidden)) → GELU → Linear(max(in, hidden), hidden)``.
        in_features: Width of the encoder features (the user's ``vision_embedding_size``).
        hidden_size: The LLM's hidden size.

    Returns:
        The projector; parameter names are ``weight``/``bias`` (linear) or ``0.*``/``2.*`` (mlp).

    Raises:
        ConfigError: Unknown type or non-positive widths.
    """
    if in_features <= 0 or hidden_size <= 0:
        raise ConfigError(
            f"proj: widths must be positive, got `vision_embedding_size`={in_features} and hidden size {hidden_size}."
        )
    if projector_type == "linear":
        return nn.Linear(in_features, hidden_size)
    if projector_type == "mlp2x_gelu":
        width = max(in_features, hidden_size)  # the user's choice: never narrower than either end
        return nn.Sequential(nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, hidden_size))
    raise ConfigError(f"`projector_type` is {projector_type!r}; use 'linear' or 'mlp2x_gelu'.")


def projector_parameter_count(projector_type: str, in_features: int, hidden_size: int) -> int:
    """Parameters of :func:`build_projector` without building it (for seed-scale tables)."""
    if projector_type == "linear":
        return in_features * hidden_size + hidden_size
    width = max(in_features, hidden_size)
    return in_features * width + width + width * hidden_size + hidden_size


__all__ = ["build_projector", "projector_parameter_count"]
