"""The run itself: the method, the plan, the engine that schedules calls, their events and records."""
