"""The API key: when the server has one, the inference routes (``/detect``, the ``/v2`` infer routes, gRPC
``ModelInfer``) need it; probes, metadata, metrics and the page stay open."""

from __future__ import annotations

import hmac

from pydantic import SecretStr

API_KEY_HEADER = "X-API-Key"


def key_refused(
    expected: SecretStr | None, given: str | None, where: str = f"the {API_KEY_HEADER} header"
) -> str | None:
    """Why a request carrying ``given`` is refused (a message naming ``where`` the key goes), or None when
    the server has no key or the key matches."""
    if expected is None:
        return None
    # surrogatepass: any str compares (a lone surrogate is a wrong key, not a UnicodeEncodeError)
    given_bytes = None if given is None else str(given).encode("utf-8", "surrogatepass")
    if given_bytes is not None and hmac.compare_digest(given_bytes, expected.get_secret_value().encode()):
        return None
    return f"{'missing' if given is None else 'wrong'} API key: send it in {where}"
