"""The server's one error type: an HTTP status and an OpenAI-style JSON body (`{"error": {message, type, param,
code}}`), so every client that speaks the OpenAI API reads the server's refusals as it reads OpenAI's."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses (4xx) or could not answer (5xx), with a message that names the cause."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        # As OpenAI: every refusal is an "invalid_request_error" (401 and 404 included); `code` narrows the cause.
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
