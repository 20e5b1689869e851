from plpriv.callbacks.memorization_monitor import MemorizationMonitor
from plpriv.callbacks.dp_sgd import DPSGD
