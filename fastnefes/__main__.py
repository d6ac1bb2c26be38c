from fastnefes.cli import main

main()
