"""Joining a Ray cluster that requires a token (Ray 2.60's ``ray start --head`` does whenever the head has one).

Ray sends the user's token (``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``)
only in token mode, which it turns on by itself only for ``--address auto``. For an address the user names, the
pipeline does the same: with ``RAY_AUTH_MODE`` unset and a token at hand, token mode is on (``RAY_AUTH_MODE`` set
by the user is theirs and wins). Without a token, a join that fails says what is missing and how to provide it.
"""
from __future__ import annotations

HOW_TO_PROVIDE = ("set RAY_AUTH_TOKEN to the head's token (`ray get-auth-token` prints it on the head), or "
                  "RAY_AUTH_TOKEN_PATH to a file holding it, or copy it to ~/.ray/auth_token")


def user_has_token() -> bool:
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    return loader.has_token(ignore_auth_mode=True)


def use_user_token() -> None:
    """Before ``ray.init(address=...)``: send the user's token if they have one (Ray's own rule for ``auto``)."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def join_failure(address: str, exc: BaseException) -> str:
    """What to tell the user when joining ``address`` failed with ``exc``."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    start = f"cannot join the Ray cluster at {address!r}: {detail}."
    if not user_has_token():
        return (f"{start} No Ray authentication token was found on this machine: if the cluster requires one "
                f"(`ray start --head` with Ray 2.60 does when the head has a token), {HOW_TO_PROVIDE}. Otherwise: "
                f"is `ray start --head` running there, and is the address right (auto, host:6379, ray://host:10001)?")
    if any(word in str(exc).lower() for word in ("auth", "token", "unauthenticated")):
        return f"{start} The cluster refused this machine's Ray token: {HOW_TO_PROVIDE}."
    return (f"{start} Is `ray start --head` running there, and is the address right (auto, host:6379, "
            f"ray://host:10001)?")
