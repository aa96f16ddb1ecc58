"""Split computing: cut a staged model between device and server and carry payloads safely."""
