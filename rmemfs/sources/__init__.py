"""Page sources: one interface for "make these runs resident in these regions" (issue 9 item 2).

``base``: the ``PageSource`` protocol. ``baseline``: pages from a published generation (the load
plan). ``lazy``: the residency map and the loader that makes a lazily recovered filesystem's
pages resident, on demand first and in the background otherwise.
"""
