{
  "targets": [
    {
      "target_name": "blockd_native",
      "sources": ["blockd_native.c", "netio.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
