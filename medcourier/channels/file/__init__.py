"""The ``file`` outbound connector: renderings written into a folder another system polls.

Many hospital systems still import results from a shared directory (HPRIM Santé above all): the
receiving side lists the folder, reads each new file and deletes or moves it. What matters then is
that a reader never sees half a file, that nothing already written is ever replaced, and that a
full disk or a missing mount holds the route instead of losing documents. See :mod:`.outbound`.

- :mod:`.outbound`: the options and the sender;
- :mod:`.plugin`: the entry point registering the ``file`` connector.
"""
