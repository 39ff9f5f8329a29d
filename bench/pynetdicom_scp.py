"""The least a pynetdicom receiver can do: the floor under ``studyvault serve``.

``python bench/pynetdicom_scp.py OUT PORT`` accepts every storage SOP class in the
usual transfer syntaxes and C-ECHO, and writes each received data set as pynetdicom
hands it over (``event.encoded_dataset()``: file meta + the bytes as received, no
decoding) into OUT. No header reading, no SHA-256, no fsync, no index; the same
``ae.maximum_pdu_size = 0`` and quiet logging as studyvault's receiver.
``bench_receive.py`` runs it beside DCMTK's ``storescp``: whatever studyvault spends
above it is studyvault's; what this spends above ``storescp`` is pynetdicom's.
"""

from __future__ import annotations

import itertools
import os
import sys

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def main() -> None:
    out, port = sys.argv[1], int(sys.argv[2])
    counter = itertools.count(1)
    _config.LOG_HANDLER_LEVEL = "none"

    def on_store(event: evt.Event) -> int:
        with open(os.path.join(out, f"{next(counter):06d}.dcm"), "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="STUDYVAULT")
    ae.maximum_pdu_size = 0
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
