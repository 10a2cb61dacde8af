"""DHT admission: every DHT request and response carries a token only swarm-key holders can make.

hivemind's :class:`~hivemind.utils.auth.TokenAuthorizerBase` signs each request and response with
the peer's RSA key, adds a nonce and a timestamp and rejects replays; what it leaves open is what
makes a token valid. Here: an HMAC under a key derived from the swarm key over the token's
fields. A peer without the swarm key gets no answer to ``ping``/``store``/``find``, and its own
requests are refused, so it can neither read nor write announcements. (libp2p connections
themselves stay open at their level: p2pd has no pre-shared-key mode.)
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

from molink.security.swarm_key import SwarmKey

#: How long a token is valid, and how early before its end a new one is made.
TOKEN_LIFETIME = timedelta(hours=1)
TOKEN_REFRESH_MARGIN = timedelta(minutes=5)
_USERNAME = "molink"


class SwarmTokenAuthorizer(TokenAuthorizerBase):
    """A hivemind authorizer whose tokens are HMACs under the swarm key."""

    def __init__(self, swarm_key: SwarmKey, local_private_key: RSAPrivateKey | None = None):
        super().__init__(local_private_key)
        self._mac_key = swarm_key.derive("molink/dht-admission")

    def _mac(self, token: AccessToken) -> bytes:
        message = b"\0".join(
            (token.username.encode(), token.public_key, token.expiration_time.encode())
        )
        return hmac.new(self._mac_key, message, hashlib.sha256).digest()

    async def get_token(self) -> AccessToken:
        expiration = datetime.now(UTC) + TOKEN_LIFETIME
        token = AccessToken(
            username=_USERNAME,
            public_key=self.local_public_key.to_bytes(),
            expiration_time=expiration.isoformat(),
        )
        token.signature = self._mac(token)
        return token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        if not hmac.compare_digest(self._mac(access_token), access_token.signature):
            return False
        try:
            expiration = datetime.fromisoformat(access_token.expiration_time)
        except ValueError:
            return False
        if expiration.tzinfo is None:
            return False
        now = datetime.now(UTC)
        return now < expiration <= now + TOKEN_LIFETIME + timedelta(minutes=1)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        expiration = datetime.fromisoformat(access_token.expiration_time)
        return datetime.now(UTC) + TOKEN_REFRESH_MARGIN >= expiration
