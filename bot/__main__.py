import sys

if sys.argv[1:2] == ["serve"]:
    # Before the imports (seconds on a busy machine): a SIGHUP now must not kill serve.
    from .hangup import hold

    hold()

from .cli import main  # noqa: E402

raise SystemExit(main())
