"""The tests' pynetdicom requestors keep their responses, as the node's own do.

pynetdicom 3.0's requestor can lose a C-STORE (or C-ECHO) response to its own reactor
thread: ``send_c_store`` pauses the reactor by clearing an event and then reading a
flag that the reactor sets *before* it waits, so the reactor can slip past the pause,
take the response and drop it ("Received unexpected C-STORE service message"); the
sender then waits for the DIMSE timeout. The node's requestors work around it
(:func:`dicom_node.send.keep_responses_for_the_requestor`); a test that plays a modality
with a plain ``AE`` hit it once in a CI run (a store answered after 30 s as an empty
status). ``tests/conftest.py`` installs :func:`associate_keeping_responses` for every test.
"""

from __future__ import annotations

from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.send import keep_responses_for_the_requestor

ORIGINAL_ASSOCIATE = AE.associate


def associate_keeping_responses(self: AE, *args: Any, **kwargs: Any) -> Association:
    """``AE.associate``, then the node's workaround on the new association."""
    assoc = ORIGINAL_ASSOCIATE(self, *args, **kwargs)
    keep_responses_for_the_requestor(assoc)
    return assoc
