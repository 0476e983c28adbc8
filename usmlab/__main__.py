from usmlab.cli import main

main()
