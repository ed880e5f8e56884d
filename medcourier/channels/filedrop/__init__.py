"""Watched drop folders: HL7 v2 files and documents with a JSON sidecar, taken from a directory.

Many hospital systems cannot speak MLLP or HTTP but can write a file to a shared folder (often an
NFS or SMB share). This channel polls such a folder, takes each file once it is complete, hands
its content to the engine's :class:`~medcourier.engine.inbound.InboundSink` and then moves it to
``processed/`` or, with a ``.error.txt`` saying why, to ``error/``.

The hard requirement is crash safety: no file is lost, and none is submitted twice in effect.
Files are claimed by an atomic rename into ``<folder>/.work/`` before being read, everything
found in ``.work`` is processed again at start-up, and every submission carries something the
engine dedupes on (MSH-10 and the sender for HL7, an ``idempotency_key`` for documents), so
processing a file again after a crash is harmless. See :mod:`.watcher` for the details.

- :mod:`.watcher`: the options model, the folder watcher and the two file formats;
- :mod:`.plugin`: the entry point registering the ``filedrop`` inbound channel type.
"""
