"""``python -m plpriv`` == ``plpriv`` (Lightning's DDP launcher re-executes this module on each rank)."""

from plpriv.entry import main

main()
