"""Sans-I/O protocol machines: they take bytes, events and `now`, and return
bytes, events and the next deadline.  Nothing here touches a socket or a clock."""
