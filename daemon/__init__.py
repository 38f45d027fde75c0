"""The real-time service: MIDI ports, clock, online encoder, engine, scheduler, OSC, MQTT."""
