"""Wire messages, settings, SLO types, clocks and ZeroMQ helpers shared by every process."""
