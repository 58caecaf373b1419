"""Recording: run a model over inputs and store the routing it actually used (forward and generate)."""

from moelens.recording.inputs import Document, documents, read_paths

__all__ = ["Document", "documents", "read_paths", "record"]


def __getattr__(name: str):
    if name == "record":  # imports torch: keep it off the package import path
        from moelens.recording.record import record

        return record
    raise AttributeError(name)
