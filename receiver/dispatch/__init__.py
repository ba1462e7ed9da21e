"""After the commit: claim due handler runs, run the handlers, record each attempt, back
off and retry, dead-letter after the last attempt; replay queues runs again."""
