"""Luminance-aware pruning (docs/method.md, 'Fitting'): a Gaussian whose color luminance is under tau is dropped."""


REC709 = (0.2126, 0.7152, 0.0722)


def luminance(params):
    """params [..., 8] -> [...] 0.2126|R| + 0.7152|G| + 0.0722|B|."""
    weights = params.new_tensor(REC709)
    return (params[..., 5:8].abs() * weights).sum(-1)


def prune_mask(params, mask, tau: float):
    """The live mask after pruning: live and luminance >= tau. Shapes stay [B, N]."""
    if tau <= 0:
        return mask
    return mask & (luminance(params) >= tau)
