"""Serving many live sequences at once: a batcher, and a WebSocket server over it.

:class:`SequenceBatcher` runs the frames of many sequences, each in a slot of
a fixed batch, as one compiled call per tick. :class:`Server` serves a batcher
over WebSocket and :class:`Client` talks to it (both need the ``websockets``
package: ``pip install 'banded_rnn[serve]'``); ``python -m banded_rnn serve``
starts a server from the command line. docs/guides/serving.md describes the
tick, the guarantees and the message format.
"""

from ._batcher import SequenceBatcher as SequenceBatcher
from ._client import Client as Client
from ._model_file import load_model as load_model
from ._model_file import save_variables as save_variables
from ._sequences import BatcherFullError as BatcherFullError
from ._server import Server as Server

__all__ = ["BatcherFullError", "Client", "SequenceBatcher", "Server"]
__all__ += ["load_model", "save_variables"]
