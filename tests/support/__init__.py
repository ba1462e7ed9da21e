"""What the tests share and pytest does not collect: stand-ins for the services the
receiver talks to, real processes, databases, sample callbacks and events."""
