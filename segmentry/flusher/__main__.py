"""``python -m segmentry.flusher``: the package is imported once, as segmentry.flusher."""

from segmentry.flusher import main

raise SystemExit(main())
