"""The session engine: stages in order, a checkpoint after each, resumable, exported at the end."""

from rqat_sdk.session.engine import RunResult, Session
from rqat_sdk.session.options import RunOptions
from rqat_sdk.session.state import SessionState

__all__ = ["RunOptions", "RunResult", "Session", "SessionState"]
