"""``python -m plpriv`` == ``plpriv`` (Lightning's DDP launcher re-executes this module on each rank)."""

from plpriv.cli import main

main()
