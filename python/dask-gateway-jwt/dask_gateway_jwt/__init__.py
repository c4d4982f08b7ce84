"""JWT bearer authentication for the stock dask-gateway client."""

import os

from dask_gateway.auth import GatewayAuth

__all__ = ["JWTAuth"]


class JWTAuth(GatewayAuth):
    """Sends ``Authorization: Bearer <token>``.

    Parameters
    ----------
    token : str, optional
        The token itself.
    token_file : str, optional
        A file holding the token; re-read whenever it changes (modification time or size).
    env : str, optional
        Environment variable holding the token when neither of the above is given
        (default ``DASK_GATEWAY_JWT``).
    """

    def __init__(self, token=None, token_file=None, env="DASK_GATEWAY_JWT"):
        self.token = token
        self.token_file = token_file
        self.env = env
        self._file_state = None
        self._file_token = None

    def _read_file(self):
        st = os.stat(self.token_file)
        state = (st.st_mtime_ns, st.st_size, st.st_ino)
        if state != self._file_state:
            with open(self.token_file) as f:
                self._file_token = f.read().strip()
            self._file_state = state
        return self._file_token

    def current_token(self):
        """The token to send now."""
        if self.token:
            return self.token
        if self.token_file:
            return self._read_file()
        token = os.environ.get(self.env)
        if not token:
            raise ValueError(
                f"JWTAuth: no token (pass token= or token_file=, or set {self.env})"
            )
        return token

    def pre_request(self, resp):
        return {"Authorization": "Bearer " + self.current_token()}, None
